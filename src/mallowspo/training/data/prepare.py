"""Preference data to token ids: ``prepare_preference_dataset`` and its settings.

Formats are TRL's preference formats (https://huggingface.co/docs/trl/dataset_formats):

    standard, explicit prompt      {"prompt": str, "chosen": str, "rejected": str}
    standard, implicit prompt      {"chosen": str, "rejected": str}   (shared prefix = prompt)
    conversational, explicit       {"prompt": [msg...], "chosen": [msg...], "rejected": [msg...]}
    conversational, implicit       {"chosen": [msg...], "rejected": [msg...]}
    msg = {"role": "system" | "user" | "assistant" | ..., "content": str}
    ({"from", "value"} messages are renamed to {"role", "content"} with TRL's helper.)
    optional, conversational rows: "tools" (tool schemas) and "chat_template_kwargs" (extra
    template variables), passed to the chat template as TRL does (see ``data.tools``)

`prepare_preference_dataset` turns such a dataset into one row per valid pair:

    prompt_input_ids     list[int]  the prompt (cut only by truncation_mode='keep_end')
    chosen_input_ids     list[int]  the chosen completion only, within the budgets
    rejected_input_ids   list[int]  the rejected completion only, within the budgets
    prompt               str        the prompt text after templating (for reports)
    row_index            int        the row's index in the input dataset (0-based)
    dispersion           float      only when PreferenceDataConfig.dispersion_column is set: the
                                    user's -log phi(x) estimate, finite and > 0
    <annotation columns> as given   PreferenceDataConfig.annotation_columns, carried unchanged
                                    (the annotators dispersion source reads and checks them)

A dataset in a known annotated layout (PreferenceDataConfig.annotation_format, e.g. MultiPref)
is first mapped to conversational pairs plus a votes column (``data.annotations``).

with len(prompt) + len(completion) <= max_length and len(completion) <=
max_completion_length. It checks in three passes and reports each problem under one kind
(the first one found for the row), so the counts add up to the rows dropped:

  1. columns (no rows needed)     missing_columns
  2. raw rows (no tokenizer)      non_string_field, mixed_formats, bad_messages, empty_field,
                                  chosen_equals_rejected, bad_tools, bad_chat_template_kwargs,
                                  missing_tools, bad_dispersion
  3. template + tokens            bad_messages (template error), prompt_too_long,
                                  completion_too_long (keep_end), completion_empty_after_truncation,
                                  chosen_equals_rejected (after truncation)

`missing_columns`, `mixed_formats` and `missing_tools` are always errors; the other kinds
are errors when `strict` and otherwise skipped, counted and logged (logger
"mallowspo.data"). Kept rows that were truncated, or whose prompt/completion boundary moved,
are counted in the report's notes.

Tokenization, as TRL 1.16's DPOTrainer does it (``data.tokenize`` lists where it differs):
  - each pair gives three texts: the prompt, prompt + chosen and prompt + rejected. Standard
    completions end with the EOS token (appended to the text unless it already ends with it,
    when `add_eos`); conversations are rendered by the chat template (the prompt with the
    generation prompt), which writes its own special tokens, so no EOS is added.
  - each text is tokenized whole, with add_special_tokens=False, and standard texts get the
    tokenizer's leading special tokens (e.g. BOS) as `tokenizer(text)` would, unless the text
    already starts with them. The completions start where the ids of the prompt and of each
    full text first differ: usually after the whole prompt (see ``split_at_prompt``).
  - budgets: max_length (prompt + completion, TRL's), max_prompt_length and
    max_completion_length (mallowspo's own; TRL 1.16 has neither), and truncation_mode (see
    PreferenceDataConfig).
  - a very long text (a multi-megabyte completion, say) is tokenized only as far as its
    tokens can matter (the budgets above), from prefixes of it: memory and time stay
    bounded, and the kept tokens are those of the whole text (see _leading_token_ids).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import datasets

from mallowspo.training.data.annotations import map_annotation_format
from mallowspo.training.data.load import source_of
from mallowspo.training.data.tokenize import (
    leading_special_ids,
    render_pair,
    split_at_prompt,
    token_limits,
    tokenize_texts,
    truncate_and_check,
    with_leading,
)
from mallowspo.training.data.validate import (
    ALWAYS_FATAL,
    PROBLEM_KINDS,
    CheckedPair,
    DataValidationError,
    RowProblem,
    ValidationReport,
    check_columns,
    check_row,
)

logger = logging.getLogger("mallowspo.data")

TRUNCATION_MODES = ("keep_start", "keep_end")
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")  # TRL's optional columns of conversational rows


@dataclass
class PreferenceDataConfig:
    """How preference rows become token ids. These defaults are also ``MallowsPOConfig``'s.

    max_length: prompt + completion tokens, TRL's meaning (None: no limit). A longer
        sequence is cut as truncation_mode says.
    max_prompt_length: mallowspo's own prompt budget (TRL 1.16 has none): a longer prompt is
        a problem ("prompt_too_long"), never cut. None (the default): no budget of its own;
        with keep_start a prompt must leave room for one completion token within max_length.
    max_completion_length: mallowspo's own completion budget: completions keep their first
        max_completion_length tokens (None: only max_length applies).
    truncation_mode: which end of a sequence over max_length is kept (TRL's names).
        "keep_start" (TRL's default): the completions are cut at their end; a prompt is never
        cut, and one that fills max_length is a problem ("prompt_too_long"; TRL drops it
        silently). "keep_end": the prompt loses its first tokens, as many as the longer
        completion needs (one prompt for both completions; TRL cuts each sequence by itself);
        a completion that alone fills max_length is a problem ("completion_too_long").
        Either way the cut rows are kept and counted in the report (note "truncated").
    strict: True: any problem raises DataValidationError. False: problem rows are skipped,
        counted in the report and logged.
    dispersion_column: optional column of user-given -log phi(x) estimates (finite, > 0),
        returned as the "dispersion" column.
    annotation_columns: columns of annotator judgements (votes, counts, strengths, rankings),
        required and returned unchanged under their names (``MallowsPOConfig``'s
        ``dispersion_*_column`` keys; the dispersion path checks their values).
    annotation_format: None, or the raw layout of an annotated dataset (``data.annotations``:
        "multipref", "helpsteer2"), mapped to conversational pairs and a votes column first.
    add_eos: end completions of standard (non-conversational) data with the EOS token.
    """

    max_length: int | None = 1024
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    strict: bool = True
    dispersion_column: str | None = None
    annotation_columns: tuple[str, ...] = ()
    annotation_format: str | None = None
    add_eos: bool = True
    truncation_mode: str = "keep_start"

    def __post_init__(self) -> None:
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or null, got {value!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (a prompt token and a completion token), got {self.max_length}")
        if self.max_length is not None and self.max_prompt_length is not None:
            if self.max_length <= self.max_prompt_length:
                raise ValueError(
                    f"max_length ({self.max_length}) must exceed max_prompt_length ({self.max_prompt_length}) "
                    "to leave room for the completion"
                )
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(
                f"truncation_mode must be one of {', '.join(map(repr, TRUNCATION_MODES))}, got {self.truncation_mode!r}"
            )
        if self.max_length is None and self.truncation_mode != "keep_start":
            _warn_once(f"truncation_mode={self.truncation_mode!r} is ignored: max_length is null (no truncation)")
        self.annotation_columns = tuple(self.annotation_columns)
        clashes = set(self.annotation_columns) & OUTPUT_COLUMNS
        if clashes:
            raise ValueError(
                f"annotation column {sorted(clashes)[0]!r} has the name of a column the tokenized data gets; rename it"
            )


@functools.cache
def _warn_once(message: str) -> None:
    """Log a warning about settings once per process (a config is built more than once)."""
    logger.warning(message)


TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
OUTPUT_COLUMNS = frozenset((*TOKEN_COLUMNS, "prompt", "row_index", "dispersion"))


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
    config.strict, and otherwise for missing_columns, mixed_formats, missing_tools, an
    empty dataset, no row left, or conversational data with a tokenizer that has no chat
    template.
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
    if config.annotation_format is not None:  # pass 0: a known annotated layout to pairs and votes
        dataset = map_annotation_format(dataset, config.annotation_format, name)
    report = ValidationReport(total_rows=len(dataset), kept_rows=0, name=name, source=source)
    if len(dataset) == 0:
        raise DataValidationError(f"Preference data {report.where} has no rows.", report)

    check_columns(list(dataset.column_names), config.dispersion_column, report, config.annotation_columns)  # pass 1
    if report.problems:
        raise DataValidationError(report.error_message(), report)
    pairs, conversational = _check_rows(dataset, config, report)  # pass 2
    _check_tokenizer(tokenizer, config, conversational, report)
    if not conversational and set(TEMPLATE_COLUMNS) & set(dataset.column_names):
        present = " and ".join(f"'{c}'" for c in TEMPLATE_COLUMNS if c in dataset.column_names)
        logger.warning(
            f"the {present} column of preference data {report.where} is ignored: the rows are standard (plain "
            "text), and only conversations go through the chat template (as in TRL)"
        )
    columns_out = _tokenize_pairs(pairs, tokenizer, config, conversational, report)  # pass 3
    _finish_report(report, len(columns_out["row_index"]), config.strict)
    # Arrow infers list<int64>, string, int64, float64 (faster than encoding declared features).
    return datasets.Dataset.from_dict(columns_out), report


def _check_rows(
    dataset: datasets.Dataset, config: PreferenceDataConfig, report: ValidationReport
) -> tuple[list[CheckedPair], bool]:
    """Pass 2: the raw checks of every row; the pairs that passed, and whether they are
    conversational. Raises DataValidationError for the problems that are always errors."""
    columns = list(dataset.column_names)
    has_prompt = "prompt" in columns
    wanted = ["prompt", "chosen", "rejected", *TEMPLATE_COLUMNS, config.dispersion_column, *config.annotation_columns]
    needed = [c for c in dict.fromkeys(wanted) if c in columns]
    pairs: list[CheckedPair] = []
    formats: dict[bool, list[int]] = {False: [], True: []}
    raw = dataset.select_columns(needed)
    for start in range(0, len(raw), 1000):
        batch = raw[start : start + 1000]
        for offset in range(len(batch[needed[0]])):
            index = start + offset
            try:
                values = {c: batch[c][offset] for c in needed}
                pair = check_row(index, values, has_prompt, config.dispersion_column, config.annotation_columns)
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
    if ALWAYS_FATAL & report.problems.keys():
        raise DataValidationError(report.error_message(), report)
    return pairs, bool(formats[True])


def _check_tokenizer(tokenizer, config: PreferenceDataConfig, conversational: bool, report: ValidationReport) -> None:
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


def _tokenize_pairs(
    pairs: list[CheckedPair], tokenizer, config: PreferenceDataConfig, conversational: bool, report: ValidationReport
) -> dict[str, list]:
    """Pass 3: render, tokenize, split and truncate each pair; the output columns."""
    eos_token = tokenizer.eos_token if (config.add_eos and not conversational) else None
    rendered: list[tuple[CheckedPair, tuple[str, str, str]]] = []
    for pair in pairs:
        try:
            rendered.append((pair, render_pair(pair, tokenizer, eos_token)))
        except RowProblem as problem:
            report.add(problem.kind, pair.index, problem.detail)
    tokenized = _token_ids(rendered, tokenizer, config, report)
    leading = [] if conversational else leading_special_ids(tokenizer)
    special_ids = set(tokenizer.all_special_ids)
    columns_out: dict[str, list] = {name: [] for name in (*TOKEN_COLUMNS, "prompt", "row_index")}
    if config.dispersion_column:
        columns_out["dispersion"] = []
    for column in config.annotation_columns:
        columns_out[column] = []
    for position, *texts_ids in tokenized:
        pair, (prompt_text, _, _) = rendered[position]
        full = [with_leading(ids, leading) for ids in texts_ids]
        try:
            p_ids, c_ids, r_ids, moved = split_at_prompt(*full)
            kept_prompt, kept, cut = truncate_and_check(
                p_ids, {"chosen": c_ids, "rejected": r_ids}, config, special_ids
            )
        except RowProblem as problem:
            report.add(problem.kind, pair.index, problem.detail)
            continue
        if moved:
            report.note("prompt_boundary_moved", pair.index, _moved_detail(tokenizer, full[0], len(p_ids)))
        if cut:
            report.note("truncated", pair.index, _cut_detail(p_ids, kept_prompt, c_ids, r_ids, kept, config))
        columns_out["prompt_input_ids"].append(kept_prompt)
        columns_out["chosen_input_ids"].append(kept["chosen"])
        columns_out["rejected_input_ids"].append(kept["rejected"])
        columns_out["prompt"].append(prompt_text)
        columns_out["row_index"].append(pair.index)
        if config.dispersion_column:
            columns_out["dispersion"].append(pair.dispersion)
        for column, value in pair.annotations.items():
            columns_out[column].append(value)
    return columns_out


def _token_ids(
    rendered: list[tuple[CheckedPair, tuple[str, str, str]]], tokenizer, config, report: ValidationReport
) -> list[tuple[int, list[int], list[int], list[int]]]:
    """(position in ``rendered``, prompt ids, prompt + chosen ids, prompt + rejected ids), without
    special tokens added, of the pairs whose prompt is not already known to be too long."""
    prompt_limit, completion_limit = token_limits(config)
    prompts = [texts[0] for _, texts in rendered]
    prompt_ids, prompt_clipped = tokenize_texts(tokenizer, prompts, [prompt_limit] * len(rendered))
    for position in sorted(prompt_clipped):  # only its first tokens were read: more than any budget
        detail = f"the prompt has more than {prompt_limit - 1} tokens ({len(prompts[position])} characters)"
        report.add("prompt_too_long", rendered[position][0].index, detail)
    fitting = [position for position in range(len(rendered)) if position not in prompt_clipped]
    # Of a full text, the prompt's tokens and a completion's budget can matter.
    limits = [None if completion_limit is None else len(prompt_ids[p]) + completion_limit for p in fitting]
    chosen_ids, _ = tokenize_texts(tokenizer, [rendered[p][1][1] for p in fitting], limits)
    rejected_ids, _ = tokenize_texts(tokenizer, [rendered[p][1][2] for p in fitting], limits)
    return [(p, prompt_ids[p], c, r) for p, c, r in zip(fitting, chosen_ids, rejected_ids)]


def _moved_detail(tokenizer, prompt_ids: list[int], kept: int) -> str:
    left = prompt_ids[kept:]
    return f"the prompt's last {len(left)} token(s), {tokenizer.decode(left)!r}, start the completions"


def _cut_detail(
    prompt: list[int], kept_prompt: list[int], chosen: list[int], rejected: list[int], kept: dict, config
) -> str:
    parts = [
        f"{name} kept {len(after)} of {len(before)} tokens"
        for name, before, after in (
            ("the prompt", prompt, kept_prompt),
            ("'chosen'", chosen, kept["chosen"]),
            ("'rejected'", rejected, kept["rejected"]),
        )
        if len(after) < len(before)
    ]
    return ", ".join(parts) + f" (truncation_mode={config.truncation_mode!r})"


def _finish_report(report: ValidationReport, kept_rows: int, strict: bool) -> None:
    """Sort the report, raise if it must, and log its summary."""
    report.kept_rows = kept_rows
    order = list(PROBLEM_KINDS)
    report.problems = {kind: sorted(report.problems[kind]) for kind in sorted(report.problems, key=order.index)}
    if report.problems and strict:
        raise DataValidationError(report.error_message(), report)
    if report.kept_rows == 0:
        tail = "No usable row is left (strict=False skipped them all)."
        raise DataValidationError(report.error_message(tail=tail), report)
    loud = report.problems or "prompt_boundary_moved" in report.notes
    (logger.warning if loud else logger.info)(report.summary())
