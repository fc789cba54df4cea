"""Ranked lists to token ids: ``prepare_list_dataset``, the lists' counterpart of
``prepare_preference_dataset``, with the same passes, problem kinds, report and budgets.

One output row per valid list:

    prompt_input_ids     list[int]        the prompt (cut only by truncation_mode='keep_end')
    responses_input_ids  list[list[int]]  the K completions' ids, within the budgets (K may differ by row)
    ranks                list[int]        the rank of each response, 0 = best; equal values are ties
    prompt               str              the prompt text after templating (for reports)
    row_index            int              the row's index in the input dataset (0-based)
    dispersion, <annotation columns>      as for pairs (``PreferenceDataConfig``)

Passes: 0. the layout (``data.list_formats``: list_format, or auto by the columns); 1. columns
(missing_columns, always an error); 2. raw rows (``data.list_validate``); then the
max_responses cap; 3. templates and tokens, as the pairs' (``data.tokenize``) with K completions:
each response gives the text prompt + response (standard: ending with the EOS; conversational:
the chat template over prompt + response), tokenized whole; the completions start where the ids
of the prompt and of all K full texts first differ (with K = 2 exactly the pair's split); the
budgets apply to each response, and keep_end cuts the one shared prompt for the longest
response. Every response must keep a content token; two with the same tokens are one response
(merged when tied, else responses_identical). Problems are errors when ``strict``, else counted
skips, as for pairs.
"""

from __future__ import annotations

import logging

import datasets
import numpy as np

from mallowspo.training.data.list_formats import (
    LIST_LAYOUTS,
    ListDataConfig,
    canonical_row,
    label_of,
    layout_columns,
    resolve_layout,
)
from mallowspo.training.data.list_validate import CheckedList, check_list_row, rerank, response_name, tied_copies
from mallowspo.training.data.load import source_of
from mallowspo.training.data.prepare import (
    TEMPLATE_COLUMNS,
    PreferenceDataConfig,
    _check_tokenizer,
    _finish_report,
    _moved_detail,
)
from mallowspo.training.data.tokenize import (
    _check_prompt_budget,
    _common_prefix,
    _keep_end,
    _keep_start,
    _with_eos,
    leading_special_ids,
    token_limits,
    tokenize_texts,
    with_leading,
)
from mallowspo.training.data.validate import (
    ALWAYS_FATAL,
    DataValidationError,
    RowProblem,
    ValidationReport,
    short_error,
)

logger = logging.getLogger("mallowspo.data")

LIST_TOKEN_COLUMNS = ("prompt_input_ids", "responses_input_ids")


def is_list_layout(dataset: datasets.Dataset, lists: ListDataConfig) -> bool:
    """Whether raw rows are lists (a list layout), not pairs."""
    return resolve_layout(list(dataset.column_names), lists) in LIST_LAYOUTS


def prepare_list_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    config: PreferenceDataConfig,
    lists: ListDataConfig,
    name: str = "train",
    *,
    source: str | None = None,
) -> tuple[datasets.Dataset, ValidationReport]:
    """Validate, template and tokenize list rows (module docstring). Returns the tokenized lists and
    the report (also logged). Raises DataValidationError as ``prepare_preference_dataset`` does."""
    source = source if source is not None else source_of(dataset)
    columns = list(dataset.column_names)
    layout = resolve_layout(columns, lists)
    report = ValidationReport(total_rows=len(dataset), kept_rows=0, name=name, source=source)
    if layout not in LIST_LAYOUTS:
        raise DataValidationError(f"Preference data {report.where} is not in a list layout (list_format={layout!r})")
    if config.annotation_format is not None:
        raise DataValidationError(
            f"dispersion_format={config.annotation_format!r} maps a layout of pairs, and preference data "
            f"{report.where} holds lists ({layout} layout); leave dispersion_format unset"
        )
    if len(dataset) == 0:
        raise DataValidationError(f"Preference data {report.where} has no rows.", report)
    label = label_of(layout, columns, lists)
    carried = [config.dispersion_column, *config.annotation_columns]
    wanted = [*layout_columns(layout, lists), label[0], *(c for c in carried if c)]
    _check_list_columns(wanted, columns, layout, label, report)  # pass 1
    items, conversational = _check_lists(dataset, layout, label, config, lists, report)  # pass 2
    items = [keep_responses(item, lists.max_responses, lists.seed) for item in items]
    _check_tokenizer(tokenizer, config, conversational, report)
    if not conversational and set(TEMPLATE_COLUMNS) & set(columns):
        logger.warning(
            f"the tools/chat_template_kwargs columns of {report.where} are ignored: the lists are plain text"
        )
    columns_out = _tokenize_lists(items, tokenizer, config, conversational, report)  # pass 3
    _finish_report(report, len(columns_out["row_index"]), config.strict)
    return datasets.Dataset.from_dict(columns_out), report


def _check_list_columns(
    wanted: list[str | None], columns: list[str], layout: str, label: tuple, report: ValidationReport
) -> None:
    missing = [c for c in wanted if c is None or c not in columns]
    if not missing:
        return
    named = [f"'{c}'" if c is not None else f"with the {label[1]} (ranking_column or scores_column)" for c in missing]
    report.add(
        "missing_columns",
        None,
        f"no column {', '.join(named)} for the {layout} list layout; the columns are {columns}",
    )
    raise DataValidationError(report.error_message(), report)


def _check_lists(
    dataset: datasets.Dataset,
    layout: str,
    label: tuple[str, str],
    config: PreferenceDataConfig,
    lists: ListDataConfig,
    report: ValidationReport,
) -> tuple[list[CheckedList], bool]:
    """Pass 2: the lists that passed the raw checks, and whether they are conversational."""
    raw_columns = [*layout_columns(layout, lists), label[0], *TEMPLATE_COLUMNS]
    carried = [c for c in (config.dispersion_column, *config.annotation_columns) if c]
    needed = [c for c in dict.fromkeys([*raw_columns, *carried]) if c in dataset.column_names]
    items: list[CheckedList] = []
    formats: dict[bool, list[int]] = {False: [], True: []}
    for index, row in enumerate(dataset.select_columns(needed)):
        try:
            canonical = {**row, **canonical_row(layout, row, lists, label)}
            item = check_list_row(index, canonical, label[1], config.dispersion_column, config.annotation_columns)
        except RowProblem as problem:
            report.add(problem.kind, index, problem.detail)
            continue
        formats[item.conversational].append(index)
        items.append(item)
        if item.merged:
            report.note("duplicates_merged", index, f"responses {item.merged} repeat earlier ones at the same rank")
    if formats[False] and formats[True]:
        minority = min(formats[False], formats[True], key=len)
        kind, other = ("conversational", "standard") if minority is formats[True] else ("standard", "conversational")
        for index in minority:
            report.add(
                "mixed_formats", index, f"it is {kind}, while {len(items) - len(minority)} other rows are {other}"
            )
    if ALWAYS_FATAL & report.problems.keys():
        raise DataValidationError(report.error_message(), report)
    return items, bool(formats[True])


def keep_responses(item: CheckedList, limit: int | None, seed: int) -> CheckedList:
    """``item`` with at most ``limit`` responses: its best and its worst (the first listed of a tied
    group) and a random choice of the others (``numpy.random.default_rng([seed, row index])``), in
    their order, ranked again (0 = best, ties kept). Unchanged when it has no more than ``limit``."""
    size = len(item.responses)
    if limit is None or size <= limit:
        return item
    best, worst = item.ranks.index(min(item.ranks)), item.ranks.index(max(item.ranks))
    others = [k for k in range(size) if k not in (best, worst)]
    drawn = np.random.default_rng([seed, item.index]).choice(others, size=limit - 2, replace=False)
    keep = sorted({best, worst, *(int(k) for k in drawn)})
    item.responses = [item.responses[k] for k in keep]
    item.ranks = rerank([item.ranks[k] for k in keep])
    return item


def _render(item: CheckedList, tokenizer, eos_token: str | None) -> tuple[str, list[str]]:
    """The prompt text and the K texts prompt + response (``data.tokenize.render_pair`` with K completions)."""
    if not item.conversational:
        return item.prompt, [item.prompt + _with_eos(r, eos_token) for r in item.responses]
    kwargs = {"tools": item.tools, **item.template_kwargs}
    try:
        prompt = tokenizer.apply_chat_template(item.prompt, tokenize=False, add_generation_prompt=True, **kwargs)
        full = [tokenizer.apply_chat_template(item.prompt + r, tokenize=False, **kwargs) for r in item.responses]
    except Exception as error:  # noqa: BLE001 - a template may raise anything (jinja2 errors)
        raise RowProblem("bad_messages", f"the chat template failed on it: {short_error(error)}") from None
    return prompt, full


def _tokenize_lists(
    items: list[CheckedList], tokenizer, config: PreferenceDataConfig, conversational: bool, report: ValidationReport
) -> dict[str, list]:
    """Pass 3: render, tokenize, split and truncate each list; the output columns."""
    eos_token = tokenizer.eos_token if (config.add_eos and not conversational) else None
    rendered = []
    for item in items:
        try:
            rendered.append((item, *_render(item, tokenizer, eos_token)))
        except RowProblem as problem:
            report.add(problem.kind, item.index, problem.detail)
    prompt_limit, completion_limit = token_limits(config)
    prompt_ids, clipped = tokenize_texts(tokenizer, [r[1] for r in rendered], [prompt_limit] * len(rendered))
    for position in sorted(clipped):
        detail = f"the prompt has more than {prompt_limit - 1} tokens ({len(rendered[position][1])} characters)"
        report.add("prompt_too_long", rendered[position][0].index, detail)
    fitting = [p for p in range(len(rendered)) if p not in clipped]
    texts = [(p, text) for p in fitting for text in rendered[p][2]]
    limits = [None if completion_limit is None else len(prompt_ids[p]) + completion_limit for p, _ in texts]
    full_ids, _ = tokenize_texts(tokenizer, [text for _, text in texts], limits)
    by_list: dict[int, list[list[int]]] = {}
    for (p, _), ids in zip(texts, full_ids):
        by_list.setdefault(p, []).append(ids)

    leading = [] if conversational else leading_special_ids(tokenizer)
    special_ids = set(tokenizer.all_special_ids)
    out: dict[str, list] = {name: [] for name in (*LIST_TOKEN_COLUMNS, "ranks", "prompt", "row_index")}
    for column in [config.dispersion_column and "dispersion"] + list(config.annotation_columns):
        if column:
            out[column] = []
    for p in fitting:
        item, prompt_text = rendered[p][0], rendered[p][1]
        prompt_full = with_leading(prompt_ids[p], leading)
        fulls = [with_leading(ids, leading) for ids in by_list[p]]
        try:
            length = min(_common_prefix(prompt_full, ids) for ids in fulls)
            if length == 0:
                raise RowProblem(
                    "bad_messages",
                    "the prompt alone and the full conversations have no leading token in common, so no prompt is "
                    "left (the chat template renders the prompt differently on its own)",
                )
            prompt, completions = prompt_full[:length], [ids[length:] for ids in fulls]
            kept_prompt, kept = truncate_list(prompt, completions, config, special_ids)
            copies = tied_copies(kept, item.ranks, lambda a, b: a == b, " after truncation")
        except RowProblem as problem:
            report.add(problem.kind, item.index, problem.detail)
            continue
        ranks = item.ranks
        if copies:
            kept = [ids for k, ids in enumerate(kept) if k not in copies]
            ranks = rerank([r for k, r in enumerate(ranks) if k not in copies])
            report.note("duplicates_merged", item.index, f"responses {copies} repeat others after truncation")
        if length < len(prompt_full):
            report.note("prompt_boundary_moved", item.index, _moved_detail(tokenizer, prompt_full, length))
        cut = [k for k in range(len(kept)) if len(kept[k]) < len(completions[k])]
        if cut or len(kept_prompt) < len(prompt):
            detail = f"the prompt kept {len(kept_prompt)} of {len(prompt)} tokens, responses {cut} were cut"
            report.note("truncated", item.index, f"{detail} (truncation_mode={config.truncation_mode!r})")
        out["prompt_input_ids"].append(kept_prompt)
        out["responses_input_ids"].append(kept)
        out["ranks"].append(ranks)
        out["prompt"].append(prompt_text)
        out["row_index"].append(item.index)
        if config.dispersion_column:
            out["dispersion"].append(item.dispersion)
        for column, value in item.annotations.items():
            out[column].append(value)
    return out


def truncate_list(
    prompt: list[int], completions: list[list[int]], config: PreferenceDataConfig, special_ids: set[int]
) -> tuple[list[int], list[list[int]]]:
    """The prompt and the K completions within the budgets (``data.tokenize``: keep_start cuts each
    completion's end, keep_end the shared prompt's start for the longest). Raises RowProblem:
    prompt_too_long, completion_too_long, completion_empty_after_truncation."""
    _check_prompt_budget(len(prompt), config)
    named = {response_name(k): ids for k, ids in enumerate(completions)}
    if config.truncation_mode == "keep_start":
        kept_prompt, kept = prompt, _keep_start(prompt, named, config)
    else:
        kept_prompt, kept = _keep_end(prompt, named, config)
    for name in named:
        if special_ids.issuperset(kept[name]):
            detail = f"{name} keeps no content token after tokenization and truncation ({len(kept[name])} tokens)"
            raise RowProblem("completion_empty_after_truncation", detail)
    return kept_prompt, list(kept.values())
